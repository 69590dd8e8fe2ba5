FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini requirements.lock ./
COPY broker broker
COPY workers workers
COPY schemas schemas
COPY mock_provider mock_provider
COPY migrations migrations
COPY ops/config.example.yaml ops/config.example.yaml
RUN pip install --no-cache-dir -c requirements.lock .
ENTRYPOINT ["switchyard"]
