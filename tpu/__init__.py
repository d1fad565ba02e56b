"""gcloud command builders and scripts to train simclr_tf on Cloud TPU VMs."""
