"""Generated from controller/proto by hack/gen-proto.sh; do not edit."""
