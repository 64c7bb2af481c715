"""File systems, path rules, publishing outputs safely in shared directories, loading TensorFlow."""
