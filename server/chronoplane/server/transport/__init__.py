"""Transport: gRPC in, domain calls, gRPC out. The only package that imports grpc."""
