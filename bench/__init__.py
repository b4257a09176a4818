"""Throughput benchmarks (ingest, data, model, e2e, loss) with environment capture and JSON output."""
