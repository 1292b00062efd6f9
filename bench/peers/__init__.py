"""Other servers to measure the service against, out of the product: a naive grpc.aio server and Triton."""
