"""Training: schedule, builders and TrainState, the train steps, the loop
(which takes hooks and never imports evaluation) and the modes' set-up.
"""
