"""Generated from mesh/proto by hack/gen-proto.sh; do not edit."""
