#!/bin/sh
# A second database for Optuna's study storage (MLflow keeps its own): run by the postgres
# image once, when its data volume is new. For an older volume:
#   docker compose exec postgres createdb -U "$POSTGRES_USER" optuna
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${OPTUNA_DB:-optuna}\""
