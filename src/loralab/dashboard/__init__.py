"""`loralab dashboard`: a local, read-only web page over a workspace that updates as runs train."""
