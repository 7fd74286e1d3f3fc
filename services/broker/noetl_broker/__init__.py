"""The broker service: a faust-streaming app folding noetl.requests + noetl.results into execution state
(one writer per execution), producing noetl.events and noetl.commands.<pool>. See docs/broker.md."""
