"""Generated from proto/cri_api.proto by `make proto` (grpcio-tools); do not edit."""
