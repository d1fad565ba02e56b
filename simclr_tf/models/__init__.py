"""Encoders and heads: ResNets (SK, SE), projection and linear heads, BN."""
