"""What evaluations and previews draw and write: per-class metrics,
pictures, the t-SNE map, the projector and the augmentation preview.
"""
