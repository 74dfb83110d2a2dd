"""Cross-framework parity: a model from one trainer loads and scores the same in the other."""
