# dishtrack service image. Build: docker build -t dishtrack .
# The container binds 0.0.0.0, so auth is on and it refuses to start without API tokens (exit 2).
# Make one with `dishtrack hash-token --name till1 --role viewer` (prints the token once and its hash line), then
# pass the hash (never the token) by environment or a mounted file:
# Run:   docker run -p 8000:8000 -e DISHTRACK_AUTH_TOKENS='till1:viewer:sha256:<hex>' dishtrack
#        docker run -p 8000:8000 -v $PWD/tokens.yaml:/etc/dishtrack/tokens.yaml:ro \
#          -e DISHTRACK_AUTH_TOKENS_FILE=/etc/dishtrack/tokens.yaml -e DISHTRACK_ALLOWED_HOSTS=dishtrack.canteen.lan \
#          -v $PWD/site.yaml:/etc/dishtrack.yaml dishtrack run --config /etc/dishtrack.yaml --host 0.0.0.0
# (or auth.tokens / auth.tokens_file in site.yaml). DISHTRACK_ALLOWED_HOSTS: the names clients use in their URLs
# besides localhost (Host allow-list); DISHTRACK_SESSION_SECRET (>= 32 chars) keeps browser logins across restarts.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY config config
COPY tracking tracking
COPY models models
COPY service service
RUN pip install --no-cache-dir '.[integrations]' && rm -rf /src

WORKDIR /data
RUN useradd --system --home /data dishtrack && chown dishtrack /data
USER dishtrack
EXPOSE 8000
# /health answers 503 ("failing") when events are not persisted, a camera never delivered a frame or the
# pipeline is stuck; urlopen raises on 503, so the check fails and the container turns unhealthy.
# /health needs no token from a loopback client (this check runs inside the container); from outside it does.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
ENTRYPOINT ["dishtrack"]
CMD ["run", "--host", "0.0.0.0", "--port", "8000"]
