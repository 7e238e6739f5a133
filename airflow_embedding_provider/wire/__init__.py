"""The wire contract: generated protobuf/gRPC code (from ``proto/``) and the vector codec."""
