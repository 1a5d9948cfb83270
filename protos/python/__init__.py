"""The wire contract, compiled: `byzps.proto.v1` holds the protoc output for protos/byzps/v1/.

The generated modules are committed (a test fails when they are stale); rebuild them with
`python -m byzps.proto.regenerate` after editing a .proto file.
"""
