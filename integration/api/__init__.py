"""Generated from integration/proto by `make proto`: containerd gRPC services for tests."""
