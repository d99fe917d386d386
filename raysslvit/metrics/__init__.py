"""Representation metrics: plain functions of tensors (CKA, token similarity, k-NN accuracy)."""
