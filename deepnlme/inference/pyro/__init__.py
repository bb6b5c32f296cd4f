"""Pyro inference: the model as a Pyro program, guides, VI, SAEM, NUTS, importance sampling."""
