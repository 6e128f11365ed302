"""Answering predictions: the predictor that loads trained models (`inference`) and the micro-batcher that groups
concurrent requests into one forward (`batching`)."""
