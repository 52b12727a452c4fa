# dishtrack service image. Build: docker build -t dishtrack .
# Run:   docker run -p 8000:8000 dishtrack                      (bundled sample video + model + SQLite)
#        docker run -p 8000:8000 -v $PWD/site.yaml:/etc/dishtrack.yaml dishtrack run --config /etc/dishtrack.yaml
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
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /data
RUN useradd --system --home /data dishtrack && chown dishtrack /data
USER dishtrack
EXPOSE 8000
# /health answers 503 ("failing") when events are not persisted, a camera never delivered a frame or the
# pipeline is stuck; urlopen raises on 503, so the check fails and the container turns unhealthy
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
ENTRYPOINT ["dishtrack"]
CMD ["run", "--host", "0.0.0.0", "--port", "8000"]
