"""reid_lab."""
