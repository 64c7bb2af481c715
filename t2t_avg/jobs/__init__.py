"""What a command does end to end: one-shot, continuous, greedy soup, compare, the Keras callback."""
