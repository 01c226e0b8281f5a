"""The report: its sources and content (build), its plots, and its Markdown and HTML templates."""
