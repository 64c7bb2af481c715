"""What a command does end to end: one-shot, continuous, soups, compare, the Keras callback."""
