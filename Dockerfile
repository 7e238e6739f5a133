# Airflow 3.3.2 with this provider installed: one image for the Airflow components and for the
# provider's own servers (airflow-embedding ai-server / upload-server). Production code only: the
# dev tools (dev/: sample data, the reference API server) stay out; docker-compose mounts them.
FROM apache/airflow:3.3.2

USER root
# The named volume mounted here takes the folder's owner, so the sample writer (user airflow) can write.
RUN mkdir -p /data && chown airflow:root /data
# Likewise for the bearer token the one-shot grpc-token service writes (mode 0600, user airflow).
RUN mkdir -p /secrets && chown airflow:root /secrets
USER airflow

COPY --chown=airflow:root pyproject.toml README.md /opt/provider/
COPY --chown=airflow:root airflow_embedding_provider /opt/provider/airflow_embedding_provider
COPY --chown=airflow:root include /opt/provider/include
# Pin Airflow to the image's version so that resolving our dependencies never upgrades it. The
# celery extra holds celery below 5.7 for compose's celery profile (README "Scaling out with Celery").
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "/opt/provider[celery]"

COPY --chown=airflow:root dags /opt/airflow/dags
