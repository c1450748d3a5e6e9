"""Helpers for testing and benchmarking ckptcore against real local servers.

Standard library only (no pytest, boto3 or cloud clients), so benchmarks and other
projects' tests can use them too:

* :mod:`ckptcore_testing.servers`: start ``moto_server`` (S3) and ``fake-gcs-server`` (GCS)
  on free loopback ports and wait until they answer.
* :mod:`ckptcore_testing.faultproxy`: an HTTP proxy that counts requests and injects
  failures (503s, dropped connections, uploads cut mid-body).
"""
