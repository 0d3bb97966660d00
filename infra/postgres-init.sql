-- One database per server (docker-compose runs this once, on an empty data volume).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
