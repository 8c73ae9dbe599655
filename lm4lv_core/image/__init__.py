"""Images: file I/O and resizing, degradations, metrics and labelled grids."""
