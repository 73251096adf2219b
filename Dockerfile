# The Chat Service image: Python 3.11, the pinned requirements, served on :8002 by uvicorn with uvloop
# and httptools, the command of `make serve` (the Makefile says why). DESIGN.md's serve command,
# `daphne -b 0.0.0.0 -p 8002 chatservice.asgi:application`, works in this image as well.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
RUN useradd --create-home --uid 10001 chat && mkdir -p /app/.cache && chown -R chat /app/.cache
USER chat

EXPOSE 8002
CMD ["uvicorn", "chatservice.asgi:application", "--host", "0.0.0.0", "--port", "8002", \
     "--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio", "--lifespan", "off", \
     "--no-access-log", "--timeout-keep-alive", "120", "--ws-max-size", "1048576"]
