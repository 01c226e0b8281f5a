"""Where results live: the store (runs, adapters), locks, and the doctor that checks both."""
