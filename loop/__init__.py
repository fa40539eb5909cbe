"""The training loop, written once for both backends (framework-free): it drives a backend
through the interface of contract/backend.py. See README "Architecture"."""
