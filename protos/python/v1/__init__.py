"""Generated from protos/byzps/v1/ by byzps.proto.regenerate; do not edit."""
