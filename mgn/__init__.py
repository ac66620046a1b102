"""Multimodal Guidance Network: train with image + caption, deploy the image-only student."""
