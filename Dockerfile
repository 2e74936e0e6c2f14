# chatsvc: one process, talking to the model server at OPENAI_BASE_URL (no model inside).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app

# Dependencies first, in their own layer: they change far less often than the code.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY chatsvc.py logging_conf.py redis_store.py tracing.py metrics.py worker_metrics.py http_protocol.py served_files.py ai_sdk.py openapi.yaml chat.html ./

RUN groupadd --system --gid 10001 chatsvc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin chatsvc
USER 10001:10001

EXPOSE 8000

# No curl in the image: Python asks /healthz itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=2)"]

# Exec form, so that python is PID 1 and receives SIGTERM itself. `python chatsvc.py` runs uvicorn
# (no --reload) with its graceful-shutdown timeout at SHUTDOWN_GRACE_S + 5, and drains before
# uvicorn stops listening (note 4 in chatsvc.py). Give the container at least that long to stop:
# `docker stop -t 35`, or terminationGracePeriodSeconds on Kubernetes.
CMD ["python", "chatsvc.py"]
