"""Training: data sets, targets, losses and loops shared by all methods."""
