"""otterhd-ray: fine-tune and evaluate Fuyu-family models on Ray."""
__version__ = "0.1.0"
