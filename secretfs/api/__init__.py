"""The Secrets Manager API: the AWS JSON 1.1 protocol and its transports.

protocol.py turns request bytes into a service call and the result or error
back into bytes; server.py carries it over HTTP/1.1 on the Unix control
socket; client.py is the CLI's side of that socket. Nothing is imported here,
so the CLI's client does not pay for trio, h11 or the server.
"""
