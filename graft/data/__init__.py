"""Data: where samples come from (sources), the raw snapshot, the data gate, splits and raw samples as a model takes them."""
