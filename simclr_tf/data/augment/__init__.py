"""SimCLR's augmentations: random crop, flip, colour jitter, grayscale,
blur, and the stateless randomness they draw from.
"""
