"""The model folder: its spec, download, the tiny test model, safetensors I/O, storage and streaming."""
