"""The image tier: builds the four component images (hack/images.sh) and runs each with podman,
without network (see test_images.py)."""
