"""Fusion methods: what each layer selects, per step and sample. Pure math on small tensors."""
