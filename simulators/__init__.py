"""Physics forward models of microscopes, with ground truth."""
