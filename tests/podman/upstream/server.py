"""The upstream server of the Podman end-to-end suite.

Serves plain HTTP on port 80 and HTTPS on port 443 (certificate /srv/cert.pem). Every answer is
one line, `paude-upstream scheme=S host=H path=P`, and every request is logged to stdout as
`request scheme=S host=H path=P`, so a test can check from the container log which requests
reached the "internet".
"""

import http.server
import signal
import ssl
import sys
import threading


def handler_for(scheme):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            host = self.headers.get("Host", "")
            print(f"request scheme={scheme} host={host} path={self.path}", flush=True)
            body = f"paude-upstream scheme={scheme} host={host} path={self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            # Requests are already logged once, in a fixed format, by do_GET.
            pass

    return Handler


def serve_http():
    http.server.ThreadingHTTPServer(("0.0.0.0", 80), handler_for("http")).serve_forever()


def serve_https():
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), handler_for("https"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain("/srv/cert.pem", "/srv/key.pem")
    # The handshake runs lazily in the handler thread, so a slow client cannot stall accept.
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    server.serve_forever()


if __name__ == "__main__":
    # As PID 1 the interpreter would ignore SIGTERM; exit at once so `podman stop` is quick.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=serve_http, daemon=True).start()
    print("paude-upstream listening on 80 and 443", flush=True)
    serve_https()
