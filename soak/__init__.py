"""
Soaks of the ``twistd connect-native`` terminator: bounded runs over real
sockets on 127.0.0.1 that measure what a long life would show (memory per
idle connection, memory over many connections), run by ``tox -e soak``,
outside the default test run.
"""
