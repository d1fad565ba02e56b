"""SimCLR's augmentations, batched: one image is a batch of one, and each
op draws one value per image from a single stateless seed per batch.

views (simclr_augment, crop_and_flip + distort, distort_views,
preprocess_for_eval) → ops (colour jitter, grayscale, blur) and crop
(crop boxes, bicubic resize) → randomness (seeds and draws).
"""
