"""One module per task: its records, readers, official split, label words and demo set."""
