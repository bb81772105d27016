"""AMQP 0-9-1 client plumbing on pika, shared by the AMQP broker and the ``rpc://`` backend.

* :mod:`~conveyor._drivers.amqp.options`: connection options, URL parsing, ``redact_url``,
  ``max_message_size``;
* :mod:`~conveyor._drivers.amqp.fields`: field tables and message properties as py-amqp
  writes them, the fix of pika's decoder;
* :mod:`~conveyor._drivers.amqp.errors`: ``translate_error``/``translating``;
* :mod:`~conveyor._drivers.amqp.link`: the I/O link (``AMQPLink``, admin operations ``Op``
  of ``rpc``/``fire`` steps), with its publisher confirms in
  :mod:`~conveyor._drivers.amqp.publisher`.

Private: nothing here is public API.
"""
