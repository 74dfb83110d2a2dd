"""Tools that never run at training time (bundle, submission, statistics): they do not ship or count as code bytes."""
