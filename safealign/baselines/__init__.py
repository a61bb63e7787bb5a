"""Baselines that build an aligned model on the same rails as the methods (``safealign.methods.METHODS``)."""
