"""Command-line tools that prepare data for simclr_tf."""
